"""TorchServe: the handler serving a gnws model (:mod:`.handler`) and the archive builder (:mod:`.archive`).

Both are modules of the installed package: ``gnws archive NAME`` packs a few-line entry file that
imports :class:`gnws.torchserve.handler.GnwsHandler`, so TorchServe needs gnws installed in the
Python it runs its workers with (the ``torchserve`` image and ``pip install 'gnws[torchserve]'`` do).
"""

import re

# TorchServe's model-name rule (torch-model-archiver's ModelExportUtils.check_model_name_regex_or_exit).
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-.]*$")
