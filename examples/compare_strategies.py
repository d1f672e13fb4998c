"""Compare test-time-compute strategies for one model on one GPU (Python API).

Run: python examples/compare_strategies.py
"""

import ttcsim

LENGTHS = "lognormal:median=800,sigma=0.7,max=4096"

print(f"{'strategy':<32} {'J/query':>9} {'p90 J':>9} {'latency s':>10} {'J/out tok':>10}")
for strategy in ["single", "vote8", "bon8", "beam4:step=128", "refine2", "budget:max=1024"]:
    r = ttcsim.predict(hw="h100", model="8b", strategy=strategy, prompt_tokens=512,
                       output_tokens=LENGTHS)
    print(f"{strategy:<32} {r.energy_j:9.0f} {r.energy_j_p90 or r.energy_j:9.0f} "
          f"{r.latency_s:10.2f} {r.j_per_output_token:10.3f}")
