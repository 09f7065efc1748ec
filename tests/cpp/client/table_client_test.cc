// Placeholder: filled in by the sparse-table work.
