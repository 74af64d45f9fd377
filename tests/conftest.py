import os

from hypothesis import HealthCheck, Phase, settings

# CI: fixed examples, no shrinking (a failure is reported as found; shrinking a slow model test can take minutes)
settings.register_profile("ci", max_examples=20, deadline=None, derandomize=True,
                          phases=[Phase.explicit, Phase.reuse, Phase.generate],
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
