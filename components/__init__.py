"""Pipeline steps: train -> export_signatures -> evaluate -> upload_model -> deploy_model -> explain_smoke.

Each step is a plain typed function in its own module with a CLI (``python -m components.<step>``);
``components.kfp_components`` wraps them as thin KFP components, so the same code runs from a CLI,
a test and a pipeline. Backends: ``local`` (on-disk registry + local endpoint) and ``vertex``.
"""

import warnings

# google-api-core warns on every import that Python 3.11 support ends in 2027; it is noise here.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"google\.api_core\..*")
