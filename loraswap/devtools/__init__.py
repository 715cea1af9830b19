"""Development tools, never imported by the runtime: the tiny random Llama and PEFT adapters for tests
(``tiny``), the ``loraswap serve`` child-process launcher for tests, demo and benchmarks (``launch``), and
the gRPC code generator (``protogen``)."""
