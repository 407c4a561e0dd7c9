"""Model parts; importing them applies the CPU allocator settings (``vargpt_mlx.cpu_allocator``)."""

from vargpt_mlx import cpu_allocator as _cpu_allocator

_cpu_allocator.tune()
