"""The runtime both APIs share: driver run, task loop, update rules, feed, Spark helpers."""
