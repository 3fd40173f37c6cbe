"""``python -m dlm_decode.lm_eval_adapter``: lm-eval's command line with the ``dlm_decode``
model registered (the package was imported, once, before this module runs)."""

from dlm_decode.lm_eval_adapter import main

main()
