"""Importing BFCL's own code (the bfcl-eval package) for differential tests: its package imports every vendor SDK
(model_config pulls in each API client) and tenacity, which are not installed (bfcl-eval comes with --no-deps).
`vendor_stubs()` puts stand-ins for those modules in sys.modules for the duration of the imports, and takes
them out again afterwards."""
import contextlib
import sys
import types


@contextlib.contextmanager
def vendor_stubs():
    added = []

    def stub(name, **attrs):
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__dict__.update(attrs)
            sys.modules[name] = module
            added.append(name)

    class _Config:
        underscore_to_dot = False  # prompt-mode models keep dotted names

    class _AnyModel(dict):
        def __missing__(self, key):
            return _Config()

    stub("bfcl_eval.constants.model_config", MODEL_CONFIG_MAPPING=_AnyModel())
    stub("bfcl_eval.model_handler.parser.java_parser", parse_java_function_call=None)
    stub("bfcl_eval.model_handler.parser.js_parser", parse_javascript_function_call=None)
    try:
        import tenacity  # noqa: F401
    except ImportError:
        decorator = lambda *a, **k: (lambda fn: fn)  # noqa: E731
        stub("tenacity", retry=decorator, retry_if_exception_message=decorator,
             retry_if_exception_type=decorator, wait_random_exponential=decorator)
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)
