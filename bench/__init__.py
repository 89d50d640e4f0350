"""CloudGate benchmark: accuracy, speed and memory side by side with the peers, in one run."""
