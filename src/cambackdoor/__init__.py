"""cambackdoor: implant, measure and study explanation (Grad-CAM) backdoors in image classifiers."""

from cambackdoor.version import __version__  # noqa: E402
from cambackdoor.errors import CamBackdoorError  # noqa: E402
from cambackdoor.models import build_model  # noqa: E402
from cambackdoor.checkpoints import load_model, save_model  # noqa: E402
from cambackdoor.gradcam import grad_cam  # noqa: E402

__all__ = ["CamBackdoorError", "build_model", "load_model", "save_model", "grad_cam", "__version__"]
