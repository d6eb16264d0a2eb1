"""What ``watch(model, optimizer)`` puts into the user's training: hooks, step counting, the guard around them.

The watcher decides *when* to measure; the forward taps, the loop watch, the
input watch, the NaN sentinel and the step timer run inside the user's forward, backward and
``optimizer.step()``, all behind one `shield`; the recorder hands a logging
step to the writer, and `live` checks it against the rules for alerts.
May import `measure`, `summary`, `rules` and `contract`; never the read path.
"""
