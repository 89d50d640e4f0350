"""CloudGate HIL harness: replay scene streams through flight.CloudGate on emulated edge boards."""
