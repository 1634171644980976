# A workspace that talks a lot: many resources and outputs, so plans and applies print thousands of
# lines. Offline like the others (terraform_data only). Used by the reliability tests.

variable "size" {
  type    = number
  default = 400
}

variable "label" {
  type    = string
  default = "chatty"
}

resource "terraform_data" "item" {
  count = var.size
  input = {
    name  = "${var.label}-${count.index}"
    index = count.index
    tags  = { owner = "delegate", batch = floor(count.index / 50) }
  }
}

output "names" {
  value = [for i in terraform_data.item : i.input.name]
}

output "batches" {
  value = distinct([for i in terraform_data.item : i.input.tags.batch])
}
