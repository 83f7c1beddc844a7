"""Dense prediction with CycleMLP backbones: object detection and instance segmentation
(:mod:`.detection`, torchvision's RetinaNet and Mask R-CNN), semantic segmentation
(:mod:`.segmentation`, Semantic FPN and segmentation_models_pytorch), the embedded datasets
(:mod:`.datasets`) and what both training commands share (:mod:`.run`)."""
