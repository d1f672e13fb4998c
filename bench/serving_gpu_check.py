"""Check the serving model (ttcsim.serving) against the reference decoder under load.

Usage (on the GPU machine)::

    python bench/serving_gpu_check.py --out $OUT [--model llama-3.1-8b] [--rates 2,8,14]

and, anywhere, to compare a recorded run with a profile::

    python bench/serving_gpu_check.py --compare bench/serving_gpu_check_h100.json \
        --profile validation/h100-a/profile.yaml

For each Poisson rate, the reference decoder (random weights, CUDA graphs,
Triton decode attention) serves a stream of vote<N> queries with continuous
batching driven by the host clock: arrived queries are admitted between decode
passes, their prompts prefilled in one pass (prefix shared by the N samples),
the samples join the running batch and leave after their own lengths.  The
decoder cannot fuse a prefill chunk into a decode pass, so the simulation it is
compared with uses ``Scheduler(fused_prefill=False)``.

Recorded per query: arrival, first-token and finish times; per pass: the batch;
energy from the NVML counter over the measured window.  Then the same arrivals
and lengths go through :func:`ttcsim.serving.simulate` with the given profile
(datasheet-default unless ``--profile``), and ``measured.json`` holds both.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def serve(dec, nvml, arrivals, prompt_tokens, lengths, max_batch, clock=time.monotonic):
    """Serve the queries on the decoder; return per-query times, per-pass batches and energy."""
    import torch

    from ttcsim.gpu.nvml import TraceSampler

    n, samples = lengths.shape
    dev = dec.device
    steps_needed = (lengths - 1).astype(int)  # decode passes per sample
    prompts = dec.random_tokens(n, prompt_tokens)
    free_gen = list(range(dec.gen_slots - 1, -1, -1))
    free_prompt = list(range(dec.prompt_slots - 1, -1, -1))
    first_t = np.full(n, np.nan)
    admit_t = np.full(n, np.nan)
    finish_t = np.full(n, np.nan)
    remaining = np.zeros(n, dtype=int)  # running samples per query
    # running sequences (host side): gen slot, prompt slot, query, passes done, passes needed
    run_seq: list[int] = []
    run_pslot: list[int] = []
    run_query: list[int] = []
    run_done: list[int] = []
    run_need: list[int] = []
    tokens = None  # device tensor of the running sequences' current tokens
    st = None
    changed = True
    pass_log = []  # (t_end, batch, kind)
    sampler = TraceSampler(nvml).start() if nvml is not None else None
    time.sleep(0.3)
    t_start = clock()
    nxt = 0
    done = 0
    while done < n:
        now = clock() - t_start
        # admit arrived queries FCFS while sequences and slots allow
        batch_new = []
        while (
            nxt < n
            and arrivals[nxt] <= now
            and len(run_seq) + samples * (len(batch_new) + 1) <= max_batch
            and free_prompt
            and len(free_gen) >= samples * (len(batch_new) + 1)
        ):
            batch_new.append(nxt)
            nxt += 1
        if batch_new:
            t_pass = clock() - t_start
            q = torch.tensor(batch_new, device=dev)
            pslots = [free_prompt.pop() for _ in batch_new]
            logits = dec.prefill(prompts.index_select(0, q), torch.tensor(pslots, device=dev))
            first = logits.argmax(-1)
            torch.cuda.synchronize(dev) if dev.type == "cuda" else None
            t = clock() - t_start
            pass_log.append((t, len(run_seq), "prefill", t_pass))
            new_tokens = []
            for j, qi in enumerate(batch_new):
                admit_t[qi] = now
                first_t[qi] = t
                remaining[qi] = samples
                for s in range(samples):
                    if steps_needed[qi, s] == 0:
                        remaining[qi] -= 1
                        continue
                    g = free_gen.pop()
                    run_seq.append(g)
                    run_pslot.append(pslots[j])
                    run_query.append(qi)
                    run_done.append(0)
                    run_need.append(int(steps_needed[qi, s]))
                    new_tokens.append(first[j : j + 1])
                if remaining[qi] == 0:
                    finish_t[qi] = t
                    free_prompt.append(pslots[j])
                    done += 1
            if new_tokens:
                tokens = torch.cat(([tokens] if tokens is not None else []) + new_tokens)
                changed = True
            continue  # look for more arrivals before the next decode pass
        if not run_seq:
            if nxt < n:
                time.sleep(max(0.0, arrivals[nxt] - (clock() - t_start)))
            continue
        if changed:
            b = len(run_seq)
            st = dec._state(b)
            st.tokens.copy_(tokens)
            st.seq.copy_(torch.tensor(run_seq, device=dev))
            st.pslot.copy_(torch.tensor(run_pslot, device=dev))
            st.plen.fill_(prompt_tokens)
            st.glen.copy_(torch.tensor(run_done, device=dev))
            changed = False
        t_pass = clock() - t_start
        dec._step(st)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t = clock() - t_start
        pass_log.append((t, len(run_seq), "decode", t_pass))
        keep = []
        for i in range(len(run_seq)):
            run_done[i] += 1
            if run_done[i] >= run_need[i]:
                qi = run_query[i]
                free_gen.append(run_seq[i])
                remaining[qi] -= 1
                if remaining[qi] == 0:
                    finish_t[qi] = t
                    free_prompt.append(run_pslot[i])
                    done += 1
            else:
                keep.append(i)
        if len(keep) < len(run_seq):
            idx = torch.tensor(keep, device=dev, dtype=torch.long)
            tokens = st.tokens.index_select(0, idx) if keep else None
            for name in ("run_seq", "run_pslot", "run_query", "run_done", "run_need"):
                lst = locals()[name]
                lst[:] = [lst[i] for i in keep]
            changed = True
        else:
            tokens = st.tokens
    t_end = clock() - t_start
    time.sleep(0.3)
    energy = None
    if sampler is not None:
        sampler.stop()
        energy = sampler
    return dict(
        t_start=t_start,
        t_end=t_end,
        admit_s=admit_t,
        first_s=first_t,
        finish_s=finish_t,
        passes=pass_log,
        sampler=energy,
    )


def summarise(arrivals, lengths, rec, first, last, energy_j=None):
    """Measured metrics over queries first..last-1 and their arrival window."""
    a = arrivals[first:last]
    longest = (lengths[first:last].max(axis=1) - 1).astype(float)
    ttft = rec["first_s"][first:last] - a
    e2e = rec["finish_s"][first:last] - a
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(
            longest > 0,
            (rec["finish_s"][first:last] - rec["first_s"][first:last]) / longest,
            np.nan,
        )
    t0, t1 = arrivals[first], arrivals[last]
    passes = np.array([(p[0], p[1]) for p in rec["passes"]])
    kinds = np.array([p[2] for p in rec["passes"]])
    t_end = passes[:, 0]
    # a pass runs from the previous pass's end (host work included) to its own end
    t_beg = np.concatenate([[0.0], t_end[:-1]])
    if len(rec["passes"][0]) > 3:  # recorded pass starts: idle gaps excluded
        t_beg = np.maximum(t_beg, np.array([p[3] for p in rec["passes"]]))
    dur = np.clip(np.minimum(t_end, t1) - np.maximum(t_beg, t0), 0, None)
    dec = kinds == "decode"
    out = {
        "window_s": t1 - t0,
        "mean_running_sequences": float((passes[:, 1] * dur * dec).sum() / (t1 - t0)),
        "busy_batch": float((passes[:, 1] * dur * dec).sum() / max(dur[dec].sum(), 1e-12)),
        "ttft_p50_s": float(np.nanpercentile(ttft, 50)),
        "ttft_p90_s": float(np.nanpercentile(ttft, 90)),
        "tpot_p50_s": float(np.nanpercentile(tpot, 50)),
        "tpot_p90_s": float(np.nanpercentile(tpot, 90)),
        "e2e_p50_s": float(np.nanpercentile(e2e, 50)),
        "e2e_p90_s": float(np.nanpercentile(e2e, 90)),
    }
    if energy_j is not None:
        out["avg_power_w"] = energy_j / (t1 - t0)
        out["energy_per_query_j"] = energy_j / (last - first)
    return out


def simulate_same(profile, spec, arrivals, prompt_tokens, lengths, max_batch, first, last):
    """The serving model on the same arrivals and lengths (separate prefill passes)."""
    from ttcsim import serving as sv
    from ttcsim.simulator.coefficients import pass_coefficients

    c = pass_coefficients(profile, spec)
    n = arrivals.size
    stream = sv.QueryStream(arrivals[None], np.full((1, n), float(prompt_tokens)), lengths[None])
    sched = sv.Scheduler(max_batch=max_batch, fused_prefill=False)
    st = sv.simulate(
        [c],
        np.array([0]),
        stream,
        sched,
        sv.ReplicaLimits(np.array([1e9]), np.zeros(1), np.zeros(1)),
        warmup_queries=first,
        tail_queries=n - last,
    )
    return {
        "mean_running_sequences": float(st.mean_batch[0]),
        "busy_batch": float(st.busy_batch[0]),
        "utilization": float(st.utilization[0]),
        "ttft_p50_s": float(st.percentile("ttft_s", 50)[0]),
        "ttft_p90_s": float(st.percentile("ttft_s", 90)[0]),
        "tpot_p50_s": float(st.percentile("tpot_s", 50)[0]),
        "tpot_p90_s": float(st.percentile("tpot_s", 90)[0]),
        "e2e_p50_s": float(st.percentile("e2e_s", 50)[0]),
        "e2e_p90_s": float(st.percentile("e2e_s", 90)[0]),
        "avg_power_w": float(st.avg_power_w[0]),
        "energy_per_query_j": float(st.energy_per_query_j[0]),
    }


KEYS = (
    "mean_running_sequences",
    "ttft_p50_s",
    "ttft_p90_s",
    "tpot_p50_s",
    "tpot_p90_s",
    "e2e_p50_s",
    "e2e_p90_s",
    "avg_power_w",
    "energy_per_query_j",
)


def compare(path, profile_name) -> None:
    """Print measured / predicted (relative error) for every level of a recorded run."""
    from ttcsim.hardware import get_profile
    from ttcsim.models import get_model

    d = json.loads(Path(path).read_text())
    first, last = d["measured"]
    profile = get_profile(profile_name)
    print(f"{d['model']}, vote{d['samples']}, prompt {d['prompt_tokens']}, profile {profile.name}")
    print("rate  " + "  ".join(f"{k:>22}" for k in KEYS))
    for level in d["levels"]:
        arrivals = np.array(level["arrivals_s"])
        lengths = np.array(level["lengths"], dtype=float)
        pred = simulate_same(
            profile,
            get_model(d["model"]),
            arrivals,
            d["prompt_tokens"],
            lengths,
            d.get("max_batch", 256),
            first,
            last,
        )
        m = level["measured"]
        cells = [f"{m[k]:8.4g}/{pred[k]:<8.4g}{pred[k] / m[k] - 1:+5.0%}" for k in KEYS]
        print(f"{level['rate_qps']:4g}  " + "  ".join(f"{c:>22}" for c in cells))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--compare", help="a measured.json to compare with --profile (no GPU)")
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--profile", default="h100")
    ap.add_argument("--rates", default="2,5")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--mean-output", type=float, default=200.0)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.compare:
        compare(args.compare, args.profile)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from ttcsim.gpu.decoder import ReferenceDecoder
    from ttcsim.hardware import get_profile
    from ttcsim.models import ModelSpec, get_model

    if args.model == "tiny":  # CPU smoke test of the driver
        spec = ModelSpec(
            name="tiny",
            n_layers=2,
            hidden_size=256,
            n_heads=4,
            n_kv_heads=2,
            head_dim=64,
            intermediate_size=512,
            vocab_size=1000,
        )
    else:
        spec = get_model(args.model)
    nvml = None
    if args.device.startswith("cuda"):
        from ttcsim.gpu.nvml import NvmlDevice

        nvml = NvmlDevice(0)
    dec = ReferenceDecoder(spec, args.device, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    n, samples = args.queries, args.samples
    max_len = int(4 * args.mean_output)
    dec.ensure_capacity(args.max_batch, args.prompt_tokens, args.max_batch, max_len)
    first, last = n // 5, n - n // 10
    report = {
        "model": spec.name,
        "profile": args.profile,
        "samples": samples,
        "max_batch": args.max_batch,
        "prompt_tokens": args.prompt_tokens,
        "mean_output": args.mean_output,
        "queries": n,
        "measured": [first, last],
        "levels": [],
    }
    if nvml is not None:
        report["gpu"] = str(nvml)
    # warm-up: capture CUDA graphs for the batch sizes a short burst visits
    warm = rng.gamma(2.0, args.mean_output / 2.0, (40, samples)).round().clip(2, max_len)
    serve(dec, None, np.zeros(40), args.prompt_tokens, warm, args.max_batch)
    for rate in [float(r) for r in args.rates.split(",")]:
        arrivals = np.cumsum(rng.exponential(1.0 / rate, n))
        lengths = rng.gamma(2.0, args.mean_output / 2.0, (n, samples)).round().clip(2, max_len)
        t0 = time.time()
        rec = serve(dec, nvml, arrivals, args.prompt_tokens, lengths, args.max_batch)
        energy = None
        if rec["sampler"] is not None:
            s = rec["sampler"]
            energy = s.energy_between(
                rec["t_start"] + arrivals[first], rec["t_start"] + arrivals[last]
            )
        measured = summarise(arrivals, lengths, rec, first, last, energy)
        predicted = simulate_same(
            get_profile(args.profile),
            spec,
            arrivals,
            args.prompt_tokens,
            lengths,
            args.max_batch,
            first,
            last,
        )
        level = {
            "rate_qps": rate,
            "wall_s": time.time() - t0,
            "measured": measured,
            "predicted": predicted,
            "arrivals_s": arrivals.tolist(),
            "lengths": lengths.astype(int).tolist(),
            "first_token_s": rec["first_s"].tolist(),
            "finish_s": rec["finish_s"].tolist(),
        }
        report["levels"].append(level)
        print(
            f"rate {rate}: "
            + ", ".join(
                f"{k} {measured[k]:.4g}/{predicted.get(k, float('nan')):.4g}"
                for k in measured
                if k != "window_s"
            ),
            flush=True,
        )
    (out / "measured.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
