"""What the scripts, tests and benchmarks share (never imported by the served code): launchers of real processes
(`launchers/`: tritonserver, the frontend, an S3 server), clients (`clients/`: tritonclient helpers, an in-process
engine sink), fixtures built offline (`fixtures/`: the converted SmolLM2, tiny diffusion pipelines and LLM families,
random and demo adapters), the client tools' own venvs (`client_envs`), perf_analyzer inputs (`perf_inputs`) and
the test session's names (`session`)."""
