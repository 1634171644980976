# A workspace that plans and applies offline: terraform_data is built into tofu/terraform,
# so no provider is downloaded. Used by `delegate-cp demo` and the end-to-end tests.

variable "greeting" {
  type        = string
  default     = "hello"
  description = "Word the example greets with."
}

variable "names" {
  type    = list(string)
  default = ["world", "delegate"]
}

resource "terraform_data" "greeting" {
  for_each = toset(var.names)
  input    = "${var.greeting}, ${each.value}!"
}

resource "terraform_data" "summary" {
  input = {
    count     = length(var.names)
    greetings = [for n in var.names : terraform_data.greeting[n].output]
  }
}

output "greetings" {
  value = [for n in var.names : terraform_data.greeting[n].output]
}

output "count" {
  value = terraform_data.summary.output.count
}
