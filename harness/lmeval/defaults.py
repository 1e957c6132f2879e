"""The bridge's names and defaults, in a module that imports nothing: the model (which imports torch and
lm-eval), the task runner and the command line all read them, and none may import another's module for them."""

MODEL_NAME = "moe-harness"  # the name in lm-eval's model registry (``lm_eval --model moe-harness``)
MODEL_TARGET = "harness.lmeval.model:MoEHarnessLM"  # lm-eval upgrades this lazy entry to the class when it loads
DEFAULT_TASKS = ("shakespeare_ppl", "shakespeare_cloze")
DEFAULT_BATCH_SIZE = 16  # sequences per forward pass
