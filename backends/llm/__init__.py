"""LLM serving: model runner, generation engine, sampling, streaming; `TritonLLMModel` is the Triton model."""


def __getattr__(name: str):
    # Lazy, so tools and tests can import backends.llm.* without Triton's pb_utils (only present in the stub).
    if name == "TritonLLMModel":
        from backends.llm.triton_model import TritonLLMModel

        return TritonLLMModel
    raise AttributeError(name)
