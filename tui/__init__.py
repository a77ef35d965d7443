"""tunewiz's Textual app: a thin client that writes run specs, launches the engine and reads run dirs."""
