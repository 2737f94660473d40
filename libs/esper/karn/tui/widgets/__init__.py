"""The TUI's panels, one widget each; the app hands them leyline messages (attributes go down)."""

from esper.karn.tui.widgets.curves import Curves
from esper.karn.tui.widgets.event_log import EventLog
from esper.karn.tui.widgets.gradients import GradientHealth
from esper.karn.tui.widgets.policy_health import PolicyHealth
from esper.karn.tui.widgets.rewards import Rewards
from esper.karn.tui.widgets.run_header import RunHeader
from esper.karn.tui.widgets.slots import SlotTable

__all__ = ["Curves", "EventLog", "GradientHealth", "PolicyHealth", "Rewards", "RunHeader", "SlotTable"]
