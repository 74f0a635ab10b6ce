"""The lm-eval adapter (`hmst-bench` model) against lm-eval's own HFLM on the same weights:
identical log-likelihoods and greedy flags, rolling windows, greedy generations with stop
strings; a task's top_k reaches generate (a generate without top_k still works, with a warning);
the cache hook makes an interrupted evaluation resume; registry and arguments."""

from __future__ import annotations

import pytest
import torch
from lm_eval.api.instance import Instance

from conftest import run_cli


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    """A dense-llama micro run (window 64) trained for a few steps, with its RUN/hf copy."""
    out = tmp_path_factory.mktemp("eval-lm") / "run"
    run_cli("train", "--arch", "dense-llama", "--size", "micro", "--budget", "2e10", "--seq-len", "64",
            "--corpus", "synthetic-facts", "--out", str(out))
    return out


@pytest.fixture(scope="module")
def ours(dense_run):
    from hmst_bench.eval.lm import HmstBenchLM

    return HmstBenchLM(run=str(dense_run), device="cpu", batch_size=4)


@pytest.fixture(scope="module")
def hflm(dense_run):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(dense_run / "hf"), device="cpu", batch_size=4, max_length=64)


def requests(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


LL_ARGS = [
    ("Githstin Datoth was born in", " Vyndum"),
    ("Githstin Datoth was born in", " Vyndum in 1821."),
    ("Githstin Datoth was born in ", "the city"),  # trailing space moves to the continuation
    ("Question: where?\nAnswer:", " A"),
    ("Question: where?\nAnswer:", " B"),
    ("Question: where?\nAnswer:", " C"),
    ("", "An empty context is scored after the prefix token."),
    ("x " * 80, " beyond the window"),  # the context is cut from the left to the window
]


def test_registered_in_lm_eval():
    import lm_eval.api.registry as registry

    from hmst_bench.eval.lm import HmstBenchLM

    assert registry.get_model("hmst-bench") is HmstBenchLM


def test_loglikelihood_equals_hflm(ours, hflm):
    a = ours.loglikelihood(requests("loglikelihood", LL_ARGS), disable_tqdm=True)
    b = hflm.loglikelihood(requests("loglikelihood", LL_ARGS), disable_tqdm=True)
    for (ll_a, g_a), (ll_b, g_b) in zip(a, b):
        assert ll_a == pytest.approx(ll_b, abs=1e-4)
        assert g_a == g_b
    assert all(ll < 0 for ll, _ in a)


def test_loglikelihood_of_a_greedy_continuation_is_flagged(ours):
    context = "Githstin Datoth was born in"
    ids = torch.tensor([ours.tok_encode(context)])
    greedy = ours.model.generate(ids, 3)[0]
    continuation = ours.tok_decode(greedy)
    # only meaningful if the text re-encodes to the same tokens
    if ours.tok_encode(context + continuation)[len(ids[0]):] != greedy:
        pytest.skip("greedy text does not re-tokenise to the same ids")
    (ll, is_greedy), = ours.loglikelihood(requests("loglikelihood", [(context, continuation)]), disable_tqdm=True)
    assert is_greedy and ll < 0


LONG_CONTINUATION = " Vyndum in 1821, the year the river froze over and the northern roads were closed for a winter."


def test_a_continuation_longer_than_the_window_is_scored_on_its_last_tokens(dense_run):
    """lm-eval's HFLM cuts the context from the left and cannot score a continuation longer than
    its window; ours scores what fits: the continuation's last `window` tokens, each after the
    tokens before it. An empty continuation is HFLM's empty sum, (0.0, True)."""
    from hmst_bench.eval.lm import HmstBenchLM

    lm = HmstBenchLM(run=str(dense_run), device="cpu", batch_size=4, max_length=8)
    context = "Githstin Datoth was born in"
    _, cont = lm._encode_pair(context, LONG_CONTINUATION)
    assert len(cont) > 9
    (ll, greedy), (empty, empty_greedy) = lm.loglikelihood(
        requests("loglikelihood", [(context, LONG_CONTINUATION), (context, "")]), disable_tqdm=True)
    ids = torch.tensor([cont[-9:-1]])
    with torch.no_grad():
        expected = lm.model.token_logprobs(ids, torch.tensor([cont[-8:]])).sum()
    assert ll == pytest.approx(float(expected), abs=1e-4) and ll < 0 and isinstance(greedy, bool)
    assert (empty, empty_greedy) == (0.0, True)


def test_window_cuts_count_what_lm_eval_encodes(dense_run):
    """window_cuts (batched, from the request texts) agrees with the tokens lm-eval's own
    TemplateLM.loglikelihood hands the model, and with the generation prompt room."""
    from lm_eval.api.model import TemplateLM

    from hmst_bench.eval.lm import HmstBenchLM

    lm = HmstBenchLM(run=str(dense_run), device="cpu", batch_size=4, max_length=16)
    ll_args = LL_ARGS + [("Githstin Datoth was born in", LONG_CONTINUATION), ("", LONG_CONTINUATION),
                         ("Question: where?\nAnswer:", " A")]  # a repeated request counts twice
    gen_args = [("short", {"until": ["\n"], "max_gen_toks": 4}), ("x " * 30, {"until": ["\n"], "max_gen_toks": 4}),
                ("x " * 10, {"until": ["\n"]})]  # the default 256 answer tokens fill the window: half is kept
    seen = []
    lm._loglikelihood_tokens = lambda reqs, **kw: seen.extend(reqs) or [(0.0, False)] * len(reqs)
    TemplateLM.loglikelihood(lm, requests("loglikelihood", ll_args), disable_tqdm=True)
    del lm._loglikelihood_tokens
    expected = {"continuation": sum(len(cont) > 16 for _, _, cont in seen),
                "context": sum(len(cont) <= 16 and len(ctx) + len(cont) > 17 for _, ctx, cont in seen),
                "prompt": sum(len(lm.tok_encode(ctx)) > lm._prompt_room(kw.get("max_gen_toks", 256)) for ctx, kw in gen_args)}
    assert lm.window_cuts(ll_args + gen_args) == expected
    assert expected["continuation"] >= 2 and expected["context"] >= 1 and expected["prompt"] == 2
    # once scored here, the requests are looked up instead of tokenised again: the same counts
    lm.loglikelihood(requests("loglikelihood", ll_args), disable_tqdm=True)
    assert set(lm._cut) == set(ll_args)
    assert lm.window_cuts(ll_args + gen_args) == expected


def test_rolling_equals_hflm(ours, hflm):
    text = ["Githstin Datoth was born in Vyndum in 1821. " * 12, "short"]
    a = ours.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in text]), disable_tqdm=True)
    b = hflm.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in text]), disable_tqdm=True)
    assert len(ours.tok_encode(text[0])) > 64  # several windows
    assert a == pytest.approx(b, abs=1e-3)


def test_greedy_generation_equals_hflm(ours, hflm):
    args = [
        ("Githstin Datoth was born in", {"until": ["\n"], "max_gen_toks": 12, "do_sample": False}),
        ("Question: Who founded Vyndum?\nAnswer:", {"until": ["Question:", "."], "max_gen_toks": 20, "do_sample": False}),
        ("The", {"until": [], "max_gen_toks": 5, "temperature": 0.0}),
    ]
    a = ours.generate_until(requests("generate_until", args), disable_tqdm=True)
    b = hflm.generate_until(requests("generate_until", args), disable_tqdm=True)
    assert a == b
    assert all("Question:" not in s for s in a)


def test_sampling_is_seeded_and_differs_from_greedy(ours):
    args = [("Githstin Datoth was born in", {"until": [], "max_gen_toks": 16, "do_sample": True, "temperature": 1.5})]
    torch.manual_seed(0)
    first = ours.generate_until(requests("generate_until", args), disable_tqdm=True)
    torch.manual_seed(0)
    again = ours.generate_until(requests("generate_until", args), disable_tqdm=True)
    greedy = ours.generate_until(requests("generate_until", [(args[0][0], {"until": [], "max_gen_toks": 16})]), disable_tqdm=True)
    assert first == again and first != greedy


def test_top_k_from_the_task_reaches_generate(ours):
    """do_sample with top_k=1 is greedy however hot the temperature; without do_sample top_k
    is not used."""
    prompt = "Githstin Datoth was born in"
    greedy = ours.generate_until(requests("generate_until", [(prompt, {"until": [], "max_gen_toks": 12})]), disable_tqdm=True)
    sampled = {"until": [], "max_gen_toks": 12, "do_sample": True, "temperature": 5.0}
    torch.manual_seed(0)
    k1 = ours.generate_until(requests("generate_until", [(prompt, {**sampled, "top_k": 1})]), disable_tqdm=True)
    torch.manual_seed(0)
    hot = ours.generate_until(requests("generate_until", [(prompt, sampled)]), disable_tqdm=True)
    assert k1 == greedy != hot


GEN_ARGS = [
    ("a", {"until": [], "max_gen_toks": 3, "do_sample": True, "temperature": 0.7, "top_k": 40, "top_p": 0.9}),
    ("b", {"until": [], "max_gen_toks": 3, "do_sample": False, "top_k": 40}),
    ("c", {"until": [], "max_gen_toks": 3, "do_sample": True, "top_k": 0}),
    ("d", {"until": [], "max_gen_toks": 3, "do_sample": True, "temperature": 1.2, "top_k": 5}),
]


def test_task_arguments_become_sampling_arguments(ours):
    got = [ours._sampling(kwargs)[0] for _, kwargs in GEN_ARGS]
    assert got == [
        {"temperature": 0.7, "top_p": 0.9, "top_k": 40},
        {"temperature": 0.0, "top_p": 1.0, "top_k": 0},  # greedy: the task's top_k is not used
        {"temperature": 1.0, "top_p": 1.0, "top_k": 0},  # do_sample without a temperature: 1
        {"temperature": 1.2, "top_p": 1.0, "top_k": 5},
    ]


def test_batched_generation_equals_one_request_at_a_time(ours):
    """Greedy and sampled answers do not depend on the batch size or on the other requests in a
    batch; repeats of one sampled request (lm-eval's repeats) differ from each other."""
    prompts = ["Githstin Datoth was born in", "The", "Question: Who founded Vyndum?\nAnswer:", "A"]
    greedy = {"until": ["\n"], "max_gen_toks": 10}
    sampled = {"until": [], "max_gen_toks": 8, "do_sample": True, "temperature": 1.3}
    args = [(p, greedy) for p in prompts] + [(p, sampled) for p in prompts] + [(prompts[0], sampled)] * 2
    answers = {}
    for size in (1, 16):
        ours.batch_size = size
        answers[size] = ours.generate_until(requests("generate_until", args), disable_tqdm=True)
    ours.batch_size = 32
    alone = [ours.generate_until(requests("generate_until", [arg]), disable_tqdm=True)[0] for arg in args[:4]]
    assert answers[1] == answers[16] and answers[16][:4] == alone
    assert answers[16][8] != answers[16][9] or answers[16][8] != answers[16][4]  # repeats are not clones


def test_request_cache_resumes_an_interrupted_evaluation(dense_run, tmp_path):
    from lm_eval.api.model import CachingLM

    from hmst_bench.eval.lm import HmstBenchLM

    lm = HmstBenchLM(run=str(dense_run), batch_size=2)
    cached = CachingLM(lm, str(tmp_path / "cache.db"))
    first = cached.loglikelihood(requests("loglikelihood", LL_ARGS[:3]))
    assert lm.computed["loglikelihood"] == 3
    lm.computed["loglikelihood"] = 0
    again = CachingLM(lm, str(tmp_path / "cache.db")).loglikelihood(requests("loglikelihood", LL_ARGS[:5]))
    assert lm.computed["loglikelihood"] == 2  # only the two new requests ran
    assert again[:3] == first


def test_bad_arguments_are_one_line(dense_run, tmp_path):
    from hmst_bench.eval.lm import HmstBenchLM
    from hmst_bench.train.rundir import RunError

    with pytest.raises(ValueError, match="batch_size must be"):
        HmstBenchLM(run=str(dense_run), batch_size="many")
    with pytest.raises(ValueError, match="needs a run directory"):
        HmstBenchLM()
    with pytest.raises(RunError, match="not a run directory"):
        HmstBenchLM(run=str(tmp_path))


# --- the CLI around lm-eval: help, and no git noise outside a checkout (issue 15 item 7) --------


def _outside_git(tmp_path):
    """A working folder in no git checkout (git stops looking above it), and its environment."""
    import os

    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    return cwd, {**os.environ, "GIT_CEILING_DIRECTORIES": str(tmp_path), "TQDM_DISABLE": "1"}


def test_lm_eval_help_is_ours_and_imports_neither_lm_eval_nor_torch():
    import subprocess
    import sys

    code = ("import sys\nfrom hmst_bench.cli import main\nsys.argv = ['hmst-bench', 'lm-eval', '--help']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('IMPORTED', 'torch' in sys.modules, 'lm_eval' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.strip().splitlines()[-1] == "IMPORTED False False"
    for needed in ("Usage: hmst-bench lm-eval", "--model hmst-bench --model_args run=RUN", "--include_path",
                   "hmst-bench lm-eval run --help", "hmst-bench lm-eval --model hmst-bench"):
        assert needed in out, needed
    assert proc.stderr == ""


def test_lm_eval_run_help_is_lm_evals():
    proc = run_cli("lm-eval", "run", "--help")
    assert "usage: lm-eval run" in proc.stdout and "--model_args" in proc.stdout


def test_quiet_git_probe_keeps_gits_complaint_off_the_console(tmp_path, monkeypatch, capfd):
    import lm_eval.evaluator as evaluator

    from hmst_bench.eval.lm import quiet_git_probe

    cwd, env = _outside_git(tmp_path)
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", env["GIT_CEILING_DIRECTORIES"])
    original = evaluator.get_git_commit_hash
    original()  # lm-eval's own probe: git's complaint reaches the console (the problem fixed here)
    assert "not a git repository" in capfd.readouterr().err
    with quiet_git_probe():
        assert evaluator.get_git_commit_hash() is None
    assert evaluator.get_git_commit_hash is original
    assert capfd.readouterr().err == ""


def test_git_sha_is_silent_when_git_fails(monkeypatch, capfd, tmp_path):
    from hmst_bench.train.rundir import git_sha

    monkeypatch.setenv("GIT_DIR", str(tmp_path / "no-repo"))  # every git command fails
    assert git_sha() is None
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("command", ["eval", "lm-eval"])
def test_evaluation_outside_a_git_checkout_prints_no_git_error(dense_run, tmp_path, command):
    import subprocess
    import sys

    cwd, env = _outside_git(tmp_path)
    if command == "eval":
        args = ["eval", "--run", str(dense_run), "--suite", "factqa", "--limit", "2", "--out", str(tmp_path / "ev")]
    else:
        args = ["lm-eval", "--model", "hmst-bench", "--model_args", f"run={dense_run}", "--tasks", "factqa",
                "--limit", "2"]
    proc = subprocess.run([sys.executable, "-m", "hmst_bench.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "factqa" in proc.stdout + proc.stderr
    assert "fatal" not in proc.stderr and "not a git repository" not in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
