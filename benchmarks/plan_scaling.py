"""Per-device temporaries of the train step on 2 vs 8 simulated CPU devices (RESULTS.md, "Planning on TPU slices").

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/plan_scaling.py 2,8 2 16 256 4096

Arguments: device counts (or TPU topologies such as v5e:2x2,v5e:4x4), layers, pairs, tokens, vocabulary of a
Qwen2.5-0.5B-shaped model (experiments/paper.py's GSM8K DPO+SPO config, fsdp over every device). Prints the
temporaries and the largest arrays of the partitioned program (an array of the global batch's shape is an
activation gathered whole over the batch).
"""
import collections
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from spo_jax import plan  # noqa: E402
plan.quiet_libtpu()
import jax  # noqa: E402
import numpy as np  # noqa: E402

from experiments import paper as m  # noqa: E402
hf = dict(m.HF_CONFIGS["qwen2.5-0.5b"]); hf.update(num_hidden_layers=int(sys.argv[2]), vocab_size=int(sys.argv[5]))
c = m.get_config("qwen2.5-0.5b,dpo,spo,gsm8k,tpu")
c.data.batch_size=int(sys.argv[3]); c.data.max_length=int(sys.argv[4])
c.logprobs.vocab_chunk = 0
c = plan.planning_config(c, hf)
B = {"f32":4,"bf16":2,"s32":4,"u32":4,"pred":1,"f16":2,"s8":1,"u8":1}
for topo in sys.argv[1].split(","):
    devs = plan.topology_devices(topo) if ":" in topo else jax.devices()[:int(topo)]
    t=time.time()
    rep = plan.plan(c, devs, programs=("train_step",))
    r = rep["programs"]["train_step"]
    print(topo, len(devs), f"arg {r['argument_bytes']/2**20:.1f} temp {r['temp_bytes']/2**20:.1f} MiB flops {r['flops']/1e9:.3f}G ({time.time()-t:.0f}s)", flush=True)
    txt = rep["executables"]["train_step"].as_text()
    sizes = collections.Counter()
    for mm in re.finditer(r"= (f32|bf16|s32|u32|pred|f16)\[([\d,]*)\]\S* (\w[\w-]*)\(", txt):
        dims = [int(x) for x in mm.group(2).split(",") if x]
        n = int(np.prod(dims)) * B[mm.group(1)]
        if n > 1<<20: sizes[(mm.group(1), mm.group(2), mm.group(3))] = max(sizes[(mm.group(1), mm.group(2), mm.group(3))], n)
    for k, n in sorted(sizes.items(), key=lambda kv: -kv[1])[:25]:
        print(f"   {n/2**20:8.1f} MiB {k}")
