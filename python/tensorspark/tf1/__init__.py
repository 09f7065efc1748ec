"""The TF1 API: the seed-compatible SparkSession, graph helpers and the TF1-graph replica."""
