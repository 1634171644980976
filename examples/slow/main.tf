# A workspace whose plan and apply spend a tunable amount of CPU time between two resources, so a
# test can act while a step is running. Offline like the others (terraform_data only), and it needs
# nothing but the tofu/terraform binary (the sandbox image has no shell, so no `sleep`).
#
# Order of a plan (with state) or an apply: `terraform_data.before` (refreshed, or changed and its
# line printed) -> `local.work` (silent CPU work) -> `terraform_data.after`. Each batch is a million
# sha256 calls: about ten seconds of one core. Used by tests/tests/agent_kill.rs.

variable "batches" {
  type    = number
  default = 0
}

variable "marker" {
  type    = string
  default = "first"
}

resource "terraform_data" "before" {
  input = var.marker
}

locals {
  # The work runs only once `before` is known: during a plan that leaves `before` alone, or during
  # the apply that changes it (a plan that changes it sees an unknown output and skips the work).
  batches = terraform_data.before.output == null ? 0 : var.batches
  work = [
    for b in range(local.batches) : sum([
      for i in range(1000) : length([
        for j in range(1000) : sha256("${terraform_data.before.output}-${b}-${i}-${j}")
      ])
    ])
  ]
}

resource "terraform_data" "after" {
  input = sum(concat([0], local.work))
}

output "work" {
  value = terraform_data.after.output
}
