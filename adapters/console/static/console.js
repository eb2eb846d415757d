// Boternity console: draws the charts (uPlot) from JSON embedded in the page.
// Each <div class="chart" data-chart="ID"> reads <script type="application/json" id="ID">
// {"x": [...labels], "series": {"name": [...values]}, "kind": "bars"|"line", "unit": "..."}
(function () {
  "use strict";
  var palette = ["#2f6fde", "#e0792f", "#1f8a4c", "#b83fb0", "#c62f2f", "#1aa3a3", "#8a6d1f"];
  function draw(box) {
    var data = JSON.parse(document.getElementById(box.dataset.chart).textContent);
    var names = Object.keys(data.series);
    var xs = data.x.map(function (_, i) { return i; });
    var fg = getComputedStyle(document.body).color;
    var series = [{ label: data.xlabel || "at", value: function (u, i) {
      return i == null ? "" : data.x[i]; } }];
    var columns = [xs];
    names.forEach(function (name, i) {
      var s = { label: name, stroke: palette[i % palette.length], width: 2,
                value: function (u, v) { return v == null ? "" : v + (data.unit || ""); } };
      if (data.kind === "bars") {
        s.fill = palette[i % palette.length] + "99";
        s.paths = uPlot.paths.bars({ size: [0.7, 40] });
      }
      series.push(s);
      columns.push(data.series[name]);
    });
    var axis = { stroke: fg, grid: { stroke: "rgba(128,128,128,.2)" },
                 ticks: { stroke: "rgba(128,128,128,.3)" } };
    var opts = {
      width: Math.max(box.clientWidth, 280), height: 220, series: series,
      scales: { x: { time: false } },
      axes: [Object.assign({ values: function (u, ticks) {
        return ticks.map(function (t) { return data.x[t] === undefined ? "" : data.x[t]; });
      } }, axis), axis],
    };
    box.innerHTML = "";
    box.dataset.drawn = names.length ? "yes" : "empty";
    new uPlot(opts, columns, box);
  }
  function drawAll() { document.querySelectorAll("[data-chart]").forEach(draw); }
  document.addEventListener("DOMContentLoaded", drawAll);
  document.addEventListener("htmx:afterSettle", function (e) {
    e.target.querySelectorAll && e.target.querySelectorAll("[data-chart]").forEach(draw);
  });
  var timer;
  window.addEventListener("resize", function () { clearTimeout(timer); timer = setTimeout(drawAll, 200); });
})();
