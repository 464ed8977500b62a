"""Rule simulate_demo_sample: thin adapter around comtip.demo.simulate_sample."""

from comtip._core.runtime import rule_logging
from comtip.demo import SimulationParams, simulate_sample

with rule_logging(snakemake.log[0]):
    simulate_sample(
        snakemake.params.out_dir,
        sample=snakemake.wildcards.demo,
        seed=snakemake.params.seed,
        params=SimulationParams(**snakemake.params.simulation),
    )
