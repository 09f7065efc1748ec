int main() { return 0; }  // placeholder: filled in by the sparse-table work
