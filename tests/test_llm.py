"""The real offline LLM (SmolLM2-135M-Instruct through llama.cpp), no mock."""

from textadapt.config import Settings
from textadapt.llm import Request, Sampling, make_backend


def test_smollm2_answers_one_sentence_and_is_reproducible():
    backend = make_backend("llama-cpp:smollm2", Settings(threads=2))
    assert backend.identity.startswith("llama-cpp:SmolLM2-135M-Instruct.Q4_1.gguf@sha256:")
    sampling = Sampling(temperature=0.99, max_tokens=50)
    reqs = [Request(f"k{i}", "What does a sandal look like? Answer in one sentence.", sampling, seed=i) for i in (1, 2, 1)]
    answers = {}
    for req, ans in backend.generate(reqs):
        assert ans.completion_tokens and 0 < ans.completion_tokens <= 50
        assert ans.text.count(".") <= 1 or ans.completion_tokens == 50  # stops at the first period
        answers.setdefault(req.seed, []).append(ans.text)
    backend.close()
    assert answers[1][0] == answers[1][1]  # the same seed samples the same answer
    assert any(a.strip() for a in answers[1] + answers[2])
