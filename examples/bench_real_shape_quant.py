"""3.56B Mixtral-style shape (issue 25), random weights, batch-1 decode: ours in bf16 against the same weights
held int8 / int4 (g128, round to nearest), each against the copy-bandwidth limit measured beside it.

    python examples/bench_real_shape_quant.py bf16 int8 int4      # JSON to bench_results/
"""
import gc
import json
import sys
from pathlib import Path

import torch

from moe_engine import LLM
from moe_engine.bench.models import build_random
from moe_engine.bench.decode import copy_bandwidth, active_weight_bytes, ours_rates
from moe_engine.quantize import QuantSpec, quantize_weights, held_weight
from moe_engine.config import EngineConfig
torch.set_num_threads(2)
NAME, PROMPT, NEW = "mixtral-3.6b", 32, 17
rows = []
for fmt in sys.argv[1:]:
    model = build_random(NAME, "cpu", torch.bfloat16)
    if fmt != "bf16":
        spec = QuantSpec(fmt, 128, True, False, False, False)
        olds = {n: held_weight(model, n).detach() for n, k in model.quantizable_weights().items() if k in spec.kinds}
        quantize_weights(model, spec, "cpu")
        for n, w in olds.items():
            held_weight(model, n).copy_(w)
        del olds
        gc.collect()
    llm = LLM.from_model(model, config=EngineConfig(num_kv_blocks=64, max_model_len=256))
    active = active_weight_bytes(model)
    bw = copy_bandwidth(torch.device("cpu"), 1 << 30)
    prompts = [[(7 * i + 3) % 50000 for i in range(PROMPT)]]
    ours_rates(llm, prompts, 3)
    best = 0.0
    for _ in range(2):
        best = max(best, ours_rates(llm, prompts, NEW)[1])
    limit = bw / active
    row = dict(shape=NAME, held=fmt, batch=1, decode_tok_s=round(best, 2), active_weight_bytes=active,
               copy_bandwidth_gb_s=round(bw / 1e9, 1), limit_tok_s=round(limit, 1), of_limit=round(best / limit, 3))
    print(json.dumps(row), flush=True)
    rows.append(row)
    del llm, model
    gc.collect()
Path("bench_results").mkdir(exist_ok=True)
json.dump(rows, open(f"bench_results/real-shape-quant-{'-'.join(sys.argv[1:])}.json", "w"), indent=1)
