"""CloudGate ground segment: knowledge distillation of cloud-mask students, INT8 export, model cards."""
