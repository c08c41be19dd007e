// Marks each image as loaded or broken once the page has loaded, so a missing artifact is visible
// (red outline) and a headless browser can check the page from its DOM (body data-images-ok / -total).
window.addEventListener("load", function () {
  var imgs = document.querySelectorAll("img"), ok = 0;
  imgs.forEach(function (img) {
    var good = img.complete && img.naturalWidth > 0;
    img.dataset.loaded = good ? "1" : "0";
    if (good) { ok += 1; } else { img.classList.add("broken"); }
  });
  document.body.dataset.imagesOk = String(ok);
  document.body.dataset.imagesTotal = String(imgs.length);
});
