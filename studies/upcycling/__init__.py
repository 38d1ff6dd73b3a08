"""Study: does upcycling pay off, and do the regularisers do what the papers say? Dense controls, paired seeds, CIs.

    python -m studies.upcycling --output_dir hf_moe_study --publish docs   # full study (CPU), then docs/study.md
    python -m studies.upcycling --output_dir /tmp/study --quick            # pipeline check, about 2 minutes
    python -m studies.upcycling --output_dir hf_moe_scale --scale          # >= 100M parameters, one CUDA GPU

Run from the repository root (the study imports ``recipes.finetune_clm`` and ``recipes.finetune_classification``
and trains every model through their ``main(argv)``, in this process, or under ``torchrun`` for the data-parallel
runs). Offline, on the Python standard library's
own sources. Expected run time, full: about 70 minutes on 2 idle cores (measured 62 without the 6 data-parallel
runs: pre-training 2 minutes, upcycling 9, Expert Choice 2, overfitting 16, sweeps 14, upcycling modes 6,
z-loss stress 2, plus scoring); longer on a busy machine, where
``OMP_NUM_THREADS=1`` is better (spinning OpenMP threads inflate the CPU time the report uses). Quick: about 1
minute idle, 2 on a shared machine. Scale: an estimated 3 to 5 hours on one H200 (not measured; see `data.SCALE`).
The report lists the measured time of each section.

Protocol: ``starts`` dense llama models are each initialised and pre-trained with their own seed (0); from each,
``seeds`` fine-tuning seeds (data order, router initialisation). Every comparison is paired (same start and seed):
the mean difference with its 95% Student-t interval. Validation chooses (learning rates, checkpoints); the test
split reports.

1. Upcycling vs dense continuation (Switch, 8 experts, renormalised top-2, every other layer) at equal steps, at
   the MoE's training FLOPs and at its in-process CPU time; dropped token-expert pairs.
2. Overfitting regime: classify source snippets by module (chance 1/classes); dense, MoE, expert dropout
   0 / 0.1 / 0.2 / 0.4, training all / non-MoE / router parameters. A default departs from the paper's value only
   where the interval of the difference excludes zero (`sections.recommendation`).
3. Router z-loss 1e-3 vs 0: test loss, the logsumexp the z-loss acts on and the raw logit statistics (RMS, mean,
   max |logit|, spread across experts), dropped pairs; a stress pair at a high learning rate.
4. Expert Choice: checkpoints scored with causal threshold routing and with training-mode routing.
5. Sweeps at equal FLOPs: learning rate x0.5 / x1 / x2 per arm, top-1 vs top-2, 4 / 8 / 16 experts, capacity
   1.0 / 1.25 / 2.0 / dropless, every layer vs every other layer; balancing over each process's micro-batch vs
   the global batch, on 2 data-parallel processes (torchrun, gloo), paired.
6. Upcycling modes at the active parameters of section 1's MoE: fine-grained experts (G = 2, 4), a shared expert
   with top-1 routed experts, auxiliary-loss-free balancing and its no-balancing control; test loss against plain
   upcycling, expert balance, dropped pairs.

``--scale`` runs the same protocol at >= 100M parameters (llama, hidden 768, 12 layers) on the whole standard
library with bf16 autocast. hf_moe computes router logits in float32 whatever the autocast (ST-MoE's selective
precision), so the scale mode tests the z-loss at bf16 training, not a bf16 router; ``--quick --scale`` runs its
code path at toy size on CPU.

Layout: ``data.py`` (sizes, the local data), ``runs.py`` (the plan of every run; every recipe option in
``recipe_argv``), ``measures.py`` (test split, router logits, inference routings on saved models), ``stats.py``
(paired intervals, bands), ``sections.py`` (each section's numbers and figures), ``provenance.py`` (what produced
a report), ``report.py`` (``study.md``, ``study/results.json``, figures; `report.publish`) and ``__main__.py``.

An interrupted study resumes: running the command again reuses the finished runs. A finished study (its report
written) is kept unless ``--overwrite``, which starts over. ``tests/studies/test_upcycling_study.py`` fails when
``docs/study.md`` no longer matches the code or the configuration (the code's hash is recorded in the report).
"""
