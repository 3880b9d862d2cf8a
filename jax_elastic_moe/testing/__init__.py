"""Test and benchmark harnesses: loopback Transport clusters (with fault injection through their
"fault", signal and kill commands), the native exchange's rank-side checks, and a counter of XLA
compilations. Production modules never import this package (an import-linter contract holds them to
it); tests and benchmarks do."""
