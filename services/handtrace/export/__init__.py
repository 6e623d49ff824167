"""Training-data export (issue #12): demonstrations as trajectories in the open computer-use
format (AgentNet / OpenCUA). ``actions`` reduces raw demonstration events to pyautogui actions;
``scrub`` fills PII drawn on frames. Nothing is imported here: scrub's worker processes must not
pay for polars."""
