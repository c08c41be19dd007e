"""betadiff web dashboard (FastAPI, server-rendered): ``dashboards.app.create_app(tracking_uri)``."""
