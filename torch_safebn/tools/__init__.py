"""The tooling room: the torch-safebn command, the benchmarks, the self-check
and the demo. A model never imports this package, and the library
(torch_safebn's modules, functional, ops, safety, convert, distributed,
reference) never imports it either; it uses the library as a user would."""
