"""Launch-grid arithmetic on the host. Triton's own `triton.cdiv` and `triton.next_power_of_2` are
constexpr functions: called from Python each unwraps its arguments as constexprs first, ~4 us a
call on a CPU core, thirteen of them in an attention forward+backward (bench/host_overhead.py)."""
from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive b."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
