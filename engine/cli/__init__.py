"""The `tunewiz` command: `main` parses and dispatches (bare, it opens the app: the one import from the
engine up into tui/), `data` holds the dataset commands, `hardware` the machine and recommendation
commands, `model` the commands that use a trained model, `coach` compare and plot, `completion` the shell
completion scripts. Each command calls the same engine code the app uses."""
