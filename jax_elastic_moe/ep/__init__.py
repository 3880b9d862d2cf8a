"""Expert parallelism: replica choice, dispatch and combine (reference and FFI backends)."""
