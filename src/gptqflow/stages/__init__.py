"""The built-in stages, one module each; importing this package registers them."""

from gptqflow.stages import (  # noqa: F401
    broadcast,
    calibrate,
    evaluate,
    hessian_reduce,
    load,
    partition,
    save,
    solve,
)
