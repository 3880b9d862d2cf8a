"""The runtimes: spmd (one process, a Mesh of local devices) and the multi-process ("mooncake") one
with its building blocks: the Mooncake data-plane transport, heartbeat failure detection and the
pyzmq control-plane message layer (see docs/RUNTIME.md). Those need the `elastic` extras (pyzmq, msgpack,
Mooncake), so nothing is imported here: `import jax_elastic_moe` works without them."""
