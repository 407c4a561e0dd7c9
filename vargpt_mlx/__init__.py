"""vargpt-mlx: VARGPT-v1.1 (understanding, generation, editing) on Apple Silicon with MLX.

    from vargpt_mlx import load, chat, generate_image, edit_image

(``vargpt_mlx.chat`` is the function; the module with ``ChatSession`` is imported as
``from vargpt_mlx.chat import ChatSession``.)
"""

__version__ = "0.1.0"

from .api import edit_image, generate_image, load  # noqa: E402
from .chat import chat  # noqa: E402  (rebinds the package attribute from the module to the function)

__all__ = ["load", "chat", "generate_image", "edit_image"]
