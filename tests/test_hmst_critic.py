"""HMST's critic (plugins/hmst/hmst_bench_hmst/critic.py, stage_critic.py) and factqa's verification.

- the critic's data: seen questions are the ones the corpus answers, unseen ones are about invented
  entities apart from the knowledge base, the corpus and factqa's test and primer (no leakage);
- its input: pooled over the positions that produced the answer, independent of padding and of
  batch mates, the same with memory on;
- the verification threshold by hand;
- `--stage critic` end to end through the CLI on a micro HMST that memorised part of a small
  knowledge base: what it records, base weights untouched, the threshold in the weights, exact
  resume after interruptions in both phases, and `eval --suite factqa --verify`;
- refusals, one line each.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import one_line_error, run_cli
from hmst_bench.data import facts
from hmst_bench.eval import hallucination
from hmst_bench_hmst import critic
from hmst_bench_hmst.model import HMSTModel
from hmst_bench_hmst.plugin import HMSTConfig

SIZES = [facts.FactsSpec(), facts.FactsSpec(100, 30, 0.5), facts.FactsSpec(300, 3, 0.2)]

# a micro HMST that memorises part of a small knowledge base in about a minute: most seen
# entities' questions answered in the corpus (the critic's seen questions), a 64-token window
CORPUS = "synthetic-facts:entities=100,repeat=10,qa=0.9"
STAGE1 = ("--arch", "hmst", "--size", "micro", "--seq-len", "64", "--lr", "3e-3", "--corpus", CORPUS,
          "--budget", "4e11", "--eval-every", "1000")
CRITIC = ("--stage", "critic", "--budget", "1e11", "--set", "critic_epochs=20", "--save-every", "50")


def _env(home) -> dict:
    return {"HMST_BENCH_HOME": str(home)}


def _info(run) -> dict:
    return json.loads((run / "run.json").read_text())


# ============================================================================== data


@pytest.mark.parametrize("size", SIZES, ids=lambda s: s.text)
def test_critic_questions_never_leak_into_factqa_or_the_corpus(size):
    kb = facts.knowledge_base(facts.SEED, size)
    data = facts.critic_questions(facts.SEED, size)
    heldout = {q["entity"] for q in data if q["id"].startswith("heldout-")}
    assert heldout and all(not q["seen"] for q in data if q["id"].startswith("heldout-"))
    kb_words = {w for e in (*kb.people, *kb.cities) for w in e.name.split()}
    assert not {w for name in heldout for w in name.split()} & kb_words  # every word of their names is new
    corpus = " ".join(text for _, text in facts.documents(facts.SEED, size)) if size.entities <= 300 else ""
    assert not any(name in corpus for name in heldout)
    seen_ids = {q["id"].split(":")[0] for q in data if not q["id"].startswith("heldout-")}
    assert seen_ids == set(facts.qa_entities(facts.SEED, size))  # exactly the entities the corpus answers
    test, primer = hallucination.documents(facts.SEED, size)
    asked = {q["id"] for q in test + primer}
    assert not asked & {q["id"] for q in data} and not {q["entity"] for q in test + primer} & heldout
    assert {q["split"] for q in data} <= {"train", "validation"}
    by_entity = {}
    for q in data:  # the split is per entity
        by_entity.setdefault(q["id"].split(":")[0], set()).add(q["split"])
    assert all(len(s) == 1 for s in by_entity.values())
    assert data == facts.critic_questions(facts.SEED, size)  # a pure function of seed and size


# ============================================================================== the critic's input


def _model(memory: bool) -> HMSTModel:
    torch.manual_seed(0)
    cfg = HMSTConfig(vocab_size=61, max_seq_len=16, d_model=32, n_layers=2, n_heads=4, n_experts=4, top_k=2,
                     memory=memory, memory_chunk=4, critic=True)
    return HMSTModel(cfg).eval()


@pytest.mark.parametrize("memory", [False, True])
def test_features_ignore_padding_and_batch_mates_and_follow_the_answer(memory):
    model = _model(memory)
    g = torch.Generator().manual_seed(1)
    prompt, answer = torch.randint(0, 61, (9,), generator=g).tolist(), torch.randint(0, 61, (3,), generator=g).tolist()
    long_prompt = torch.randint(0, 61, (20 if memory else 13,), generator=g).tolist()
    alone = critic.features(model, [prompt], [answer])
    batched = critic.features(model, [long_prompt, prompt], [[5], answer])
    assert alone.shape == (1, 32 + critic.N_SCALARS)
    torch.testing.assert_close(batched[1], alone[0], rtol=1e-5, atol=1e-5)
    # the pooled part is the mean of the hidden states that produced the answer's three tokens
    with torch.no_grad():
        ids = torch.tensor([prompt + answer])
        hidden = (torch.cat([h for _, h, _, _ in model.segments(ids)], dim=1) if memory else model.forward_all(ids)[0])
    torch.testing.assert_close(alone[0, :32], hidden[0, 8:11].mean(0), rtol=1e-5, atol=1e-5)
    logp = torch.log_softmax(model.logits(ids)[0, 8:11].float(), -1)
    lp = logp.gather(-1, torch.tensor(answer)[:, None]).squeeze(-1)
    torch.testing.assert_close(alone[0, 32:35], torch.stack([lp.mean(), lp.min(), lp[0]]), rtol=1e-5, atol=1e-5)
    other = critic.features(model, [prompt], [answer[:2] + [(answer[2] + 1) % 61]])
    # the last answer token is produced, never read: the pooled states stay, its log-probability changes
    torch.testing.assert_close(other[0, :32], alone[0, :32])
    assert not torch.allclose(other, alone)
    changed = critic.features(model, [prompt], [[(answer[0] + 1) % 61] + answer[1:]])
    assert not torch.allclose(changed[0, :32], alone[0, :32])  # an earlier answer token is read
    empty = critic.features(model, [prompt], [[]])  # nothing generated: the prompt's last state
    torch.testing.assert_close(empty[0, :32], hidden[0, 8], rtol=1e-5, atol=1e-5)


def test_greedy_generation_keeps_the_features_of_its_own_pass():
    """The features hallucination_scores finds for a generated answer are the decoding pass's,
    equal to one pass over prompt + answer (left padding in the batch, every prefix of the answer)."""
    from hmst_bench.generation import right_padded

    model = _model(False)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 61, (9,), generator=g).tolist(), torch.randint(0, 61, (5,), generator=g).tolist()]
    out = model.generate(*right_padded(prompts, "cpu")[:1], 6, lengths=torch.tensor([9, 5]))
    for b in range(2):
        for n in (0, 3, 6):
            traced = model._traced[(tuple(prompts[b]), tuple(out[b][:n]))]
            torch.testing.assert_close(traced, critic.features(model, [prompts[b]], [out[b][:n]])[0], rtol=1e-5, atol=1e-5)


def test_scores_are_probabilities_and_the_detector_is_declared():
    model = _model(False)
    assert model.hallucination_detector and model.hallucination_threshold is None
    s = torch.sigmoid(model.critic(critic.features(model, [[1, 2, 3], [4, 5]], [[6], [7, 8]]))).tolist()
    assert len(s) == 2 and all(0 < v < 1 for v in s)
    model.critic.threshold.fill_(0.4)
    assert model.hallucination_threshold == pytest.approx(0.4)
    assert not _plain().hallucination_detector


def _plain() -> HMSTModel:
    return HMSTModel(HMSTConfig(vocab_size=61, max_seq_len=16, d_model=32, n_layers=2, n_heads=4, n_experts=4))


def test_threshold_by_hand():
    # scores (wrong?): keeping <= 0.2 keeps two right (+2); <= 0.35 adds a wrong (+1); <= 0.5 a
    # right (+2); <= 0.8 two wrong (0); everything (1.0) the same 0 -> 0.5 is best
    scores = [0.1, 0.2, 0.35, 0.5, 0.8, 0.8]
    wrong = [False, False, True, False, True, True]
    assert critic.choose_threshold(scores, wrong) == 0.5
    assert critic.choose_threshold([0.3, 0.6], [False, False]) == 1.0  # nothing to withhold: keep all
    assert critic.choose_threshold([0.3, 0.6], [True, True]) == 0.0  # all wrong: withhold everything
    # ties at 0.5 (one right, one wrong) are kept or withheld together: +0 either way -> keep all
    assert critic.choose_threshold([0.5, 0.5], [True, False]) == 1.0


# ============================================================================== end to end


@pytest.fixture(scope="module")
def critic_runs(bench_home, tmp_path_factory):
    """Stage 1 in S1 (kept pristine), then the critic stage in a copy, A."""
    root = tmp_path_factory.mktemp("critic")
    s1, a = root / "S1", root / "A"
    run_cli("train", *STAGE1, "--out", str(s1), env=_env(bench_home))
    shutil.copytree(s1, a)
    run_cli("train", *CRITIC, "--out", str(a), env=_env(bench_home))
    return SimpleNamespace(s1=s1, a=a, info=_info(a))


def _metrics(run, kind):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("kind") == kind]


def test_critic_stage_records_its_work_and_keeps_the_base(critic_runs):
    info, s1 = critic_runs.info, _info(critic_runs.s1)
    assert info["status"] == "complete" and info["stage"] == "critic"
    assert info["stages"]["1"]["achieved_flops"] == s1["achieved_flops"]
    assert info["config"]["critic"] is True
    answers = _metrics(critic_runs.a, "critic_answers")
    assert answers[-1]["answered"] == answers[-1]["of"] == len(facts.critic_questions(facts.SEED, facts.FactsSpec.parse(CORPUS)))
    # every answering batch and every critic step is charged; nothing past the budget
    answering = answers[-1]["flops"]
    assert answering == pytest.approx(sum(a["batch_flops"] for a in answers))
    assert answering < info["achieved_flops"] <= 1e11 and info["steps"] > 0
    val = _metrics(critic_runs.a, "critic_validation")[-1]
    assert 0 <= val["threshold"] <= 1 and val["n"] > 0
    after, before = load_file(critic_runs.a / "model.safetensors"), load_file(critic_runs.s1 / "model.safetensors")
    assert {k for k in after if not k.startswith("critic.")} == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k  # the base is frozen
    assert float(after["critic.threshold"]) == pytest.approx(val["threshold"])


def test_interrupted_critic_stage_resumes_exactly(critic_runs, bench_home, tmp_path):
    from hmst_bench.train.loop import TrainSettings, train

    out = tmp_path / "B"
    shutil.copytree(critic_runs.s1, out)
    settings = dict(out=out, stage="critic", budget="1e11", save_every=50, overrides={"critic_epochs": 20})

    def stop(when):
        def check(ctx):
            if when(ctx):
                os.kill(os.getpid(), signal.SIGINT)  # the trainer turns it into a clean stop
        return check

    cut = train(TrainSettings(**settings), progress=stop(lambda ctx: ctx.extra_state.get("answered") == 32))
    assert cut["status"] == "interrupted"
    cut = train(TrainSettings(out=out, resume=True), progress=stop(lambda ctx: ctx.step == 7))
    assert cut["status"] == "interrupted" and cut["steps"] == 7
    resumed = json.loads(run_cli("train", "--resume", "--out", str(out), "--json", env=_env(bench_home)).stdout)
    full = critic_runs.info
    assert resumed["status"] == "complete"
    for key in ("steps", "tokens", "achieved_flops", "final_train_loss", "config_hash"):
        assert resumed[key] == full[key], key
    assert (out / "model.safetensors").read_bytes() == (critic_runs.a / "model.safetensors").read_bytes()


def test_eval_factqa_with_verification(critic_runs, bench_home, tmp_path):
    run = critic_runs.a
    proc = run_cli("eval", "--run", str(run), "--suite", "factqa", "--limit", "24", "--verify", "--out",
                   str(tmp_path / "ev"), "--json", env=_env(bench_home))
    metrics = {m["metric"]: m["value"] for m in json.loads(proc.stdout)[0]["metrics"] if m["task"] == "factqa"}
    record = json.loads((tmp_path / "ev" / "factqa.json").read_text())
    threshold = float(load_file(run / "model.safetensors")["critic.threshold"])
    assert record["provenance"]["verification"] == {"threshold": pytest.approx(threshold),
                                                    "chosen_on": "the detector's validation split"}
    v = record["hallucination"]["verification"]
    assert v["without"]["acc"] == metrics["acc"] and v["with"]["acc"] == metrics["verified_acc"]
    assert {"detector_auroc", "detector_aurc", "verified_hallucination", "verified_abstention"} <= set(metrics)
    detector = record["hallucination"]["detector"]
    assert detector["n"] == record["hallucination"]["answered"]
    # one forward pass per query: this process generated every answer, so the critic read the
    # generating pass's states for each (none read again)
    assert detector["features_from_generation"] == detector["n"] and detector["features_recomputed"] == 0
    # a threshold of 1 withholds nothing
    proc = run_cli("eval", "--run", str(run), "--suite", "factqa", "--limit", "24", "--verify", "--verify-threshold",
                   "1", "--out", str(tmp_path / "ev1"), "--json", env=_env(bench_home))
    v1 = json.loads((tmp_path / "ev1" / "factqa.json").read_text())["hallucination"]["verification"]
    assert v1["withheld"] == 0 and v1["with"] == v1["without"] and v1["chosen_on"] == "--verify-threshold"


# ============================================================================== refusals


def test_refusals_are_one_line(critic_runs, bench_home, tmp_path):
    env = _env(bench_home)
    empty = tmp_path / "empty"
    assert "train stage 1 first" in one_line_error(run_cli("train", "--arch", "hmst", "--stage", "critic", "--out",
                                                      str(empty), "--budget", "1e11", env=env, check=False))
    assert not empty.exists() or not any(empty.iterdir())
    plain = tmp_path / "plain"  # a knowledge base without answered questions
    run_cli("train", "--arch", "hmst", "--size", "micro", "--seq-len", "64", "--corpus", "synthetic-facts",
            "--budget", "1e10", "--out", str(plain), env=env)
    before = {p: p.read_bytes() for p in plain.rglob("*") if p.is_file()}
    assert "qa=F with F > 0" in one_line_error(run_cli("train", "--stage", "critic", "--out", str(plain), "--budget",
                                                  "1e11", env=env, check=False))
    assert {p: p.read_bytes() for p in plain.rglob("*") if p.is_file()} == before  # left as it was
    for args, needle in ((("--verify", "--verify-threshold", "1.5"), "[0, 1]"),
                         (("--verify-threshold", "0.5"), "add --verify")):
        assert needle in one_line_error(run_cli("eval", "--run", str(critic_runs.a), "--suite", "factqa", "--limit", "2",
                                           *args, env=env, check=False))
    # a model without a critic has nothing to verify with: every answer is kept, and said so
    run_cli("eval", "--run", str(plain), "--suite", "factqa", "--limit", "2", "--verify", env=env)
    record = json.loads((plain / "eval" / "factqa.json").read_text())
    assert record["provenance"]["verification"]["threshold"] is None
    v = record["hallucination"]["verification"]
    assert v["withheld"] == 0 and v["with"] == v["without"]
