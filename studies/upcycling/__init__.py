"""Study: does upcycling pay off, and do the regularisers do what the papers say? Dense controls, seeds, plots.

    python -m studies.upcycling --output_dir hf_moe_study            # full study, from the repository root
    python -m studies.upcycling --output_dir /tmp/study --quick      # pipeline check, under 2 minutes

Offline, on CPU, on the Python standard library's own sources (``data.py``, as ``recipes/demo.py``). Every model
trains through the recipes (``finetune_clm.main`` / ``finetune_classification.main``, run in this
process); the study only prepares data, scores saved checkpoints and writes the report
(``report/README.md``, tables and PNG plots, the per-section overlays made with `hf_moe.compare`).

0. A small dense llama LM is pre-trained on the training files (the CLM recipe's dense control).
1. Upcycling vs dense continuation: the upcycled Switch MoE (8 experts, renormalised top-2, every
   other layer) and the dense model, fine-tuned from the same start on the same data and schedule
   (constant learning rate after warm-up, so an intermediate evaluation is a fair "stop here"), for
   several seeds. Compared at equal steps and at equal compute: the dense run goes on for longer and
   is read at the MoE's measured training time and at its training FLOPs.
2. Overfitting regime: classify source snippets by the module they come from, with a small training
   set for many epochs. Dense, upcycled MoE, expert dropout 0.1 / 0.4, and training only the
   non-MoE parameters (ST-MoE's fine-tuning recommendation). Train/validation curves and gap.
3. Router z-loss 0 vs 1e-3 (the runs of 1 with the coefficient set to 0, and one pair at a high
   learning rate): quality, router logit magnitude (RMS of the logsumexp, the z-loss's square
   root), loss spikes and gradient norm.
4. Expert Choice: the upcycled model's saved checkpoints scored with causal threshold routing and
   with training-mode (non-causal, whole-sequence) routing, against the training length.

Layout: ``data.py`` (sizes, the local data), ``runs.py`` (one function per kind of run; every recipe option
in ``recipe_argv``), ``sections.py`` (each section's numbers and figures from the runs), ``report.py`` (the
report, results.json) and ``__main__.py`` (the command line).

An interrupted study resumes: running the command again reuses the finished runs. A finished study
(its report written) is kept unless ``--overwrite``, which starts over.
"""
