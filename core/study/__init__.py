"""Studies: seeds x methods from settings files, with tables, statistics and plots.

- :mod:`.runner`: the cells (one run directory per data set and seed) and the executors that
  run them (serial, local worker processes, Ray);
- :mod:`.outputs`: table.md, results.csv/json, stats.md/json and one PNG per metric.
"""
