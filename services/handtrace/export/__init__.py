"""Training-data export (issue #12): demonstrations as trajectories in the open computer-use
format (AgentNet / OpenCUA). ``actions`` reduces raw demonstration events to pyautogui actions."""

from handtrace.export.actions import ACTION_COLUMNS, label_events, reduce_actions

__all__ = ["ACTION_COLUMNS", "label_events", "reduce_actions"]
