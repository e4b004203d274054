"""Every registered family of the five we had, through `apply`, composed from the shared mixins."""
import pytest

pytest.importorskip("diffusers")

from integration_mixins import (HybridPolicyMixin, MaskedTextMixin, RoundTripMixin,  # noqa: E402
                                SdpaMatchesDefaultMixin)


class TestFlux(SdpaMatchesDefaultMixin, HybridPolicyMixin, RoundTripMixin):
    family = "flux"


class TestSD3(SdpaMatchesDefaultMixin, HybridPolicyMixin, RoundTripMixin):
    family = "sd3"


class TestSD35(SdpaMatchesDefaultMixin, HybridPolicyMixin, RoundTripMixin):
    family = "sd35"


class TestCogVideoX(SdpaMatchesDefaultMixin, HybridPolicyMixin, RoundTripMixin):
    family = "cogvideox"


class TestHunyuanVideo(SdpaMatchesDefaultMixin, HybridPolicyMixin, MaskedTextMixin, RoundTripMixin):
    family = "hunyuan_video"
    text_lengths = [12, 7]


class TestMochi(SdpaMatchesDefaultMixin, HybridPolicyMixin, MaskedTextMixin, RoundTripMixin):
    family = "mochi"
    text_lengths = [11, 4]
