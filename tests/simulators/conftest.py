"""The simulators' own pytest plugin provides the stack fixtures here. (Once it is registered
as the ``cwg`` pytest11 entry point these imports become redundant; pytest refuses
``pytest_plugins`` outside the top-level conftest, hence the import.)"""

from simulators.pytest_plugin import gateway, gateway_options, gateway_stack

__all__ = ["gateway", "gateway_options", "gateway_stack"]
