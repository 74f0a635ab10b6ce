"""HMST's critic stage: train the critic (critic.py) on the model's own answers, the base frozen.

`hmst-bench train --stage critic --out R --budget B` continues the complete stage 1 (or 2) in R,
whose corpus must be a sized knowledge base with answered questions
(`synthetic-facts:...,qa=F`, F > 0). The trainer builds the model with `critic=true` (the plugin's
`stage_config`): the base keeps stage 1's weights, frozen, and only the critic's parameters reach
the optimiser (`ctx.train_only`).

1. Answering: the model answers, greedily and exactly as factqa asks (the factqa prompt and
   generation arguments, through the evaluator's own `HmstBenchLM.generate_until`), every
   question of `facts.critic_questions`: the questions the corpus answers (seen entities, which
   factqa never asks) and questions about `facts.heldout_unseen` entities (neither in the corpus
   nor among factqa's). factqa's `judge` labels each answer; abstentions carry no label and are
   left out. The critic's features come from the answering pass itself (`critic.from_trace`;
   from one more pass over prompt + answer only for a model with memory).
2. Training: the critic is fitted to (features, wrong) of the "train" split, `critic_epochs`
   passes of shuffled minibatches (a pure function of the seed and epoch), the shared recipe's
   AdamW, warmup and cosine schedule. Then the validation split's scores choose the verification
   threshold (`critic.choose_threshold`), saved with the weights.

Budget: every answering batch and every feature pass is measured by the shared meter and charged
as it happens; answering stops early when the next batch would pass 90% of the budget (the rest
is for training). The critic's first training step is measured and each step charged that much;
training ends after `critic_epochs` or when the budget is spent, whichever is first, and the run
records what was spent. Checkpoints hold the answers and features so far, so `--resume` continues
exactly; metrics.jsonl logs each answering batch (`kind: critic_answers`), the training steps and
the validation result (`kind: critic_validation`: AUROC, threshold, counts).
"""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import torch

from hmst_bench.train.context import TrainContext
from hmst_bench.train.loop import TrainError

ANSWER_BATCH = 16
CRITIC_BATCH = 32
ANSWER_SHARE = 0.9  # answering stops before passing this share of the budget


def run(ctx: TrainContext) -> None:
    from hmst_bench.data import facts
    from hmst_bench.eval import hallucination
    from hmst_bench.train.rundir import read_info

    if not ctx.config.critic:  # the trainer adds the critic only when the stage continues an earlier one
        raise TrainError(f"the critic stage continues a trained run, and {ctx.run_dir} has none: train stage 1 "
                         f"first, then hmst-bench train --stage critic --out {ctx.run_dir}")
    if ctx.budget.kind != "flops":
        raise TrainError("the critic stage takes a FLOPs budget (e.g. --budget 1e12), not a token budget")
    corpus = read_info(ctx.run_dir).get("corpus_spec")
    size = facts.FactsSpec.parse(corpus) if facts.is_facts(corpus) else None
    if size is None or not size.qa:
        raise TrainError(f"the critic learns from questions the training corpus answers, and {corpus!r} answers none: "
                         "train stage 1 on --corpus synthetic-facts:entities=N,repeat=R,qa=F with F > 0")
    questions = facts.critic_questions(facts.SEED, size)
    try:
        primer = hallucination.documents(facts.SEED, size)[1]
    except ValueError as exc:
        raise TrainError(str(exc)) from None
    ctx.train_only(ctx.model.critic)
    state = ctx.restore() if ctx.resuming else {"answered": 0, "features": [], "wrong": [], "split": [],
                                                 "outcomes": {}, "phase": "answer"}
    if state["phase"] == "answer":
        _answer(ctx, questions, primer, state)
    if ctx.stop_signal is None:
        _train_critic(ctx, state)


def _answer(ctx: TrainContext, questions: list[dict], primer: list[dict], state: dict) -> None:
    from hmst_bench.eval import hallucination
    from hmst_bench.eval.lm import HmstBenchLM
    from hmst_bench.train.rundir import Run

    model, tok = ctx.model, ctx.tokenizer
    lm = HmstBenchLM(run=Run(ctx.run_dir, model, tok, ctx.spec, {}, ctx.config), device=str(ctx.accelerator.device),
                     batch_size=ANSWER_BATCH, progress=False)
    gen = dict(hallucination.GREEDY_GENERATION)
    last = None
    while state["answered"] < len(questions) and ctx.stop_signal is None:
        if last is not None and ctx.meter.flops + last > ANSWER_SHARE * ctx.budget.amount:
            break
        batch = questions[state["answered"] : state["answered"] + ANSWER_BATCH]
        prompts = [hallucination.prompt(q["question"], primer) for q in batch]

        def work():
            answers = lm.generate_until([SimpleNamespace(args=(p, gen)) for p in prompts], disable_tqdm=True)
            x = model.critic_features(prompts, [hallucination.first_line(a) for a in answers])
            tokens = sum(len(lm.tok_encode(p + a)) for p, a in zip(prompts, answers))
            return answers, x, tokens

        (answers, x, tokens), flops = ctx.meter.measure(work, model)
        ctx.meter.add(flops, tokens, steps=0)
        last = flops
        outcomes = [hallucination.judge(a, q["answer"], q["seen"]) for a, q in zip(answers, batch)]
        for q, outcome, row in zip(batch, outcomes, x.cpu()):
            state["outcomes"][outcome] = state["outcomes"].get(outcome, 0) + 1
            if outcome != "abstained":
                state["features"].append(row)
                state["wrong"].append(outcome == "hallucinated")
                state["split"].append(q["split"])
        state["answered"] += len(batch)
        ctx.log(kind="critic_answers", answered=state["answered"], of=len(questions), batch_flops=flops,
                **dict(model.hallucination_stats),
                **{f"n_{k}": v for k, v in state["outcomes"].items()})
        ctx.checkpoint(state)
        ctx.on_progress(ctx)
    if ctx.stop_signal is None:
        state["phase"] = "train"


def _train_critic(ctx: TrainContext, state: dict) -> None:
    from hmst_bench.eval.hallucination import auroc
    from hmst_bench_hmst import critic

    model = ctx.model
    train = [i for i, s in enumerate(state["split"]) if s == "train"]
    wrong = torch.tensor(state["wrong"], dtype=torch.float32)
    if len(train) < 2 or len(set(wrong[train].tolist())) < 2:
        raise TrainError(f"the critic needs right and wrong answers to learn from; {len(train)} answers "
                         f"({state['outcomes']}) is not enough: raise --budget, or train stage 1 longer")
    x = torch.stack(state["features"]).to(ctx.accelerator.device)
    wrong = wrong.to(x.device)
    per_epoch = math.ceil(len(train) / CRITIC_BATCH)
    if "planned" not in state:
        first = _minibatches(ctx.recipe.seed, 0, train)[0]
        probe = ctx.meter.measure(lambda: critic.bce(model, x[first], wrong[first]).backward(), model)[1]
        ctx.optimizer.zero_grad(set_to_none=True)
        ctx.meter.flops_per_step = probe
        room = ctx.budget.amount - ctx.meter.flops
        steps = min(ctx.config.critic_epochs * per_epoch, int(room // probe) if probe > 0 else 0)
        if steps < 1:
            raise TrainError(f"budget {ctx.budget.text} is spent answering ({ctx.meter.flops:.3g} FLOPs); "
                             f"raise --budget to at least {ctx.meter.flops + 10 * per_epoch * probe:.2g}")
        state["planned"] = steps
        ctx.plan(steps)
        ctx.extra_state = state
    ctx.eval_every = 0  # the base is frozen: its validation loss cannot change
    model.critic.train()
    while ctx.step < state["planned"] and ctx.stop_signal is None:
        epoch, k = divmod(ctx.step, per_epoch)
        rows = _minibatches(ctx.recipe.seed, epoch, train)[k]
        loss = critic.bce(model, x[rows], wrong[rows])
        loss.backward()
        ctx.optimizer_step(float(loss.detach()))
        ctx.after_step(float(loss.detach()), {}, flops=ctx.meter.flops_per_step, tokens=0)
    model.critic.eval()
    if ctx.stop_signal is not None:
        return
    val = [i for i, s in enumerate(state["split"]) if s == "validation"]
    with torch.no_grad():
        scores = torch.sigmoid(model.critic(x[val])).tolist() if val else []
    labels = [bool(wrong[i]) for i in val]
    threshold = critic.choose_threshold(scores, labels) if val else 1.0
    model.critic.threshold.fill_(threshold)
    ctx.log(kind="critic_validation", n=len(val), n_wrong=sum(labels), auroc=auroc(scores, labels),
            threshold=threshold, n_train=len(train), answered=state["answered"])


def _minibatches(seed: int, epoch: int, rows: list[int]) -> list[list[int]]:
    order = list(rows)
    random.Random(f"critic:{seed}:{epoch}").shuffle(order)
    return [order[i : i + CRITIC_BATCH] for i in range(0, len(order), CRITIC_BATCH)]
