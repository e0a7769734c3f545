"""Evaluation and routing analysis of trained checkpoints.

  scoring          Scorer: batched, windowed, data-parallel log-likelihood of token sequences
  tasks            zero-shot tasks (LAMBADA, HellaSwag, PIQA, ARC, WinoGrande, BLiMP, CBT): readers and scorers
  perplexity       validation-split and text-file perplexity
  routing          expert load, expert change rate between checkpoints, router/competition agreement
  plots            competesmoe-plot: loss, expert load, competition and routing figures
  cli              competesmoe-eval (and `competesmoe-eval routing`)
  lm_eval_adapter  the model as an EleutherAI lm-evaluation-harness LM (optional extra `lmeval`)
  distributed      sharding work over torchrun ranks and gathering the results
"""
