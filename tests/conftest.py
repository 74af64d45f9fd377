import os

# The test models are tiny: intra-op threads only add contention, which on a loaded 2-core machine makes
# the suite many times slower (seen: 24 s against 573 s for test_properties.py). Subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

from hypothesis import HealthCheck, Phase, settings  # noqa: E402

# CI: fixed examples, no shrinking (a failure is reported as found; shrinking a slow model test can take minutes)
settings.register_profile("ci", max_examples=20, deadline=None, derandomize=True,
                          phases=[Phase.explicit, Phase.reuse, Phase.generate],
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
