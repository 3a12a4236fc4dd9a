// Follow the Airflow UI's theme: it keeps the choice (light, dark or system) in localStorage under "theme",
// which this same-origin frame can read; "system" and no choice follow the browser.
(function () {
  function apply() {
    var choice = null;
    try { choice = window.localStorage.getItem("theme"); } catch (e) { choice = null; }
    var dark = choice === "dark" ||
      ((choice === null || choice === "system") && window.matchMedia("(prefers-color-scheme: dark)").matches);
    document.documentElement.classList.toggle("dark", dark);
  }
  apply();
  window.addEventListener("storage", apply);
  window.matchMedia("(prefers-color-scheme: dark)").addEventListener("change", apply);
})();
